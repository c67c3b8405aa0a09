"""Malformed command lines and configs a new user types: each is one ``gradsparse: error:`` line
naming what is wrong, exit status 2, and nothing written (no run directory, no sweep folder)."""

import json

import pytest
import yaml

from gradsparse.cli import main

from test_config_cli import TOY  # the three-worker toy quadratic config


@pytest.fixture
def base(tmp_path):
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump(TOY))
    return p


def one_error_line(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gradsparse: error: "), err
    assert "Traceback" not in err
    return err


def left_behind(tmp_path, *keep):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


@pytest.mark.parametrize("override, needle", [
    # true/false is not a number (pydantic alone reads steps: true as 1, weights [true, false] as 1/0)
    ("steps=true", "config key 'steps': invalid value True: true/false is not allowed here"),
    # a union says every allowed form; list positions are [i]; 1e8 (text to YAML 1.1) is read as a number
    ("workers.batch_size=fulll", "config key 'workers.batch_size': invalid value 'fulll': Input should be a valid integer, "
     "unable to parse string as an integer or Input should be 'full'"),
    ("workers.batch_size=1e8", "config key 'workers.batch_size': invalid value 100000000: batch_size must be an "
     "integer in [1, 1000000] or 'full'"),
    ("workers.weights=[1,abc,1]", "config key 'workers.weights[1]': invalid value 'abc'"),
    ("schedule.lr=1/M", "Input should be '1/L'"),
    # the task's seed is the run's; a hard-threshold needs its lambda
    ("task.options.seed=3", "config key 'task.options': seed=3: a task's data are drawn from the run's seed"),
    ("algorithm.compressor={kind: hard_threshold}", "hard_threshold needs threshold: a number lambda >= 0"),
    # k = 0 sends nothing, so the model never moves
    ("algorithm.compressor.k=0", "topk option k=0: a message of no entries sends nothing"),
    ("algorithm.topology={kind: bidirectional, down_compressor: {kind: topk, k: 0}}", "option k=0"),
    # a key given twice (PyYAML keeps the last one silently)
    ("task={name: toy_quadratic, options: {dim: 3, dim: 4}}", "key 'dim' is given twice at line 1, column 41"),
    ("workers.weights=[true,false,true]", "config key 'workers.weights'"),
    ("algorithm.compressor={kind: topk, density: true}", "topk option density=True"),
    ("algorithm.compressor={kind: approximate_topk, k: 1, sample_fraction: true}", "option sample_fraction=True"),
    # switches and seeds of the randomised compressors
    ("algorithm.compressor={kind: randomk, k: 1, seed: -1}", "randomk option seed=-1: random-k seed must be an integer >= 0"),
    ("algorithm.compressor={kind: randomk, k: 1, scale: maybe}", "randomk option scale='maybe': random-k scale must be true or false"),
    ("algorithm.compressor={kind: approximate_topk, k: 1, exact: 3}", "option exact=3: approximate top-k exact must be true or false"),
    # threshold rules take exactly their keys
    ("algorithm.compressor={kind: hard_threshold, threshold: {rule: topk_volume}}", "k is missing"),
    ("algorithm.compressor={kind: hard_threshold, threshold: {rule: topk_volume, k: 1, x: 2}}", "unknown key 'x'"),
    ("algorithm.compressor={kind: hard_threshold, threshold: {rule: precision, epsilon: abc}}",
     "threshold rule precision needs a number epsilon > 0, got 'abc'"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, capsys, base, override, needle):
    rc = main(["run", str(base), "--set", override, "--out", str(tmp_path / "run"), "--no-progress"])
    err = one_error_line(capsys, rc)
    assert needle in err
    assert left_behind(tmp_path, "base.yaml") == []


def test_option_named_only_when_the_message_is_about_it(tmp_path, capsys, base):
    """'k' must not be blamed because the letter occurs in 'top-k' inside another option's message."""
    rc = main(["run", str(base), "--set", "algorithm.compressor={kind: topk, density: 2.0}",
               "--out", str(tmp_path / "run")])
    err = one_error_line(capsys, rc)
    assert "topk option density=2.0" in err and "option k=" not in err


def test_self_referential_yaml_alias_is_refused(tmp_path, capsys):
    p = tmp_path / "loop.yaml"
    p.write_text("a: &a [*a]\n")
    err = one_error_line(capsys, main(["run", str(p), "--out", str(tmp_path / "run")]))
    assert "nests deeper than 64 levels" in err
    assert left_behind(tmp_path, "loop.yaml") == []


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    """Nine levels of nine aliases is 9**9 (387 million) values once expanded."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    err = one_error_line(capsys, main(["run", str(p), "--out", str(tmp_path / "run")]))
    assert "config holds more than 1000000 values" in err


def test_overlong_run_name_is_refused_before_the_filesystem_does(tmp_path, capsys, base):
    name = "x" * 300
    err = one_error_line(capsys, main(["run", str(base), "--out", str(tmp_path / name)]))
    assert "is 300 bytes; a run directory's name is at most 231 bytes" in err
    assert left_behind(tmp_path, "base.yaml") == []


@pytest.mark.parametrize("argv, needle", [
    (["run", "--no-such-flag", "BASE"], "unrecognized arguments: --no-such-flag (see gradsparse --help)"),
    (["bench", "--bogus"], "bench: unrecognized arguments: --bogus (see gradsparse bench --help)"),
    (["bench", "--only", "nope"], "bench --only: unknown benchmark(s) ['nope']"),
    (["compare", "OUT/nowhere"], "is not a run directory (it holds no metrics.csv)"),
    (["bench", "--only", ","], "bench --only ',' names no benchmark"),
    (["sweep", "BASE", "--grid", "steps=[1,2", "--out", "OUT/sw"], "--grid steps='[1' is not valid YAML"),
    (["launch", "BASE", "--nproc", "3", "--max-restarts", "-1", "--dry-run"], "--max-restarts must be >= 0, got -1"),
    (["launch", "BASE", "--nproc", "x"], "argument --nproc: invalid int value: 'x'"),
    (["sweep", "BASE", "--grid", "steps=2,3", "--processes", "0", "--out", "OUT/sw"], "--processes must be >= 1"),
])
def test_bad_command_lines_are_one_line(tmp_path, capsys, monkeypatch, base, argv, needle):
    argv = [str(base) if a == "BASE" else a.replace("OUT", str(tmp_path)) for a in argv]
    monkeypatch.chdir(tmp_path)  # bench writes bench_results/ in the working folder: it must not
    err = one_error_line(capsys, main(argv))
    assert needle in err
    assert left_behind(tmp_path, "base.yaml") == []


def test_help_still_prints_usage_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--help"])
    assert stop.value.code == 0
    assert "usage: gradsparse run" in capsys.readouterr().out


def test_outputs_under_a_regular_file_are_refused_before_anything_runs(tmp_path, capsys, base):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    err = one_error_line(capsys, main(["sweep", str(base), "--grid", "steps=2,3", "--out", str(blocker)]))
    assert "exists and is not a directory" in err
    err = one_error_line(capsys, main(["launch", str(base), "--nproc", "3", "--out", str(blocker / "x"), "--dry-run"]))
    assert "is a file, not a directory" in err
    # compare: a file given as a run, and a plot path under a file
    err = one_error_line(capsys, main(["compare", str(blocker)]))
    assert "is not a run directory" in err
    run_dir = tmp_path / "r"
    assert main(["run", str(base), "--out", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    err = one_error_line(capsys, main(["compare", str(run_dir), "--out", str(blocker / "x.png")]))
    assert "cannot write --out" in err
    assert blocker.read_text() == "not a folder"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_a_key_given_twice_in_a_config_file_is_refused_with_its_line(tmp_path, capsys):
    p = tmp_path / "twice.yaml"
    p.write_text(yaml.safe_dump(TOY) + "steps: 9\n")
    err = one_error_line(capsys, main(["run", str(p), "--out", str(tmp_path / "run")]))
    assert "key 'steps' is given twice at line" in err
    assert left_behind(tmp_path, "twice.yaml") == []


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    """'<<: *anchor' followed by an explicit key is YAML's way to override, not a duplicate."""
    from gradsparse.config import load_config

    p = tmp_path / "merge.yaml"
    p.write_text("task: {name: toy_quadratic}\n"
                 "steps: 2\n"
                 "algorithm:\n"
                 "  compressor: &up {kind: topk, k: 1}\n"
                 "  topology: {kind: bidirectional, down_compressor: {<<: *up, k: 2}}\n")
    cfg = load_config(p)
    assert cfg.algorithm.compressor.options()["k"] == 1
    assert cfg.algorithm.topology.down_compressor.kind == "topk"
    assert cfg.algorithm.topology.down_compressor.options()["k"] == 2


def test_a_file_that_is_not_libsvm_is_named_with_its_line(tmp_path, capsys, base):
    bad = tmp_path / "data.svm"
    bad.write_text("+1 1:0.5 2:1\n-1 1:0.25 two:3\n")
    rc = main(["run", str(base), "--set", f"task={{name: logreg, options: {{libsvm_path: {bad}}}}}",
               "--out", str(tmp_path / "run")])
    err = one_error_line(capsys, rc)
    assert f"{bad}: not a valid LIBSVM file: line 2" in err
    assert left_behind(tmp_path, "base.yaml", "data.svm") == []
